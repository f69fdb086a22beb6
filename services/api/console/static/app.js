// The console's shell: top bar, routing between pages, sign-in when the API asks for a token.

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { onUnauthorized, token } from "./api.js";
import { BASE, html, Link, navigate, useRoute } from "./ui.js";
import { JobsPage } from "./pages/jobs.js";
import { JobPage } from "./pages/job.js";
import { NewJobPage } from "./pages/new.js";
import { ChatPage } from "./pages/chat.js";
import { SignInPage } from "./pages/signin.js";

function page(path) {
  if (path === "/" || path === "/jobs") return html`<${JobsPage} />`;
  const job = path.match(/^\/jobs\/([A-Za-z0-9-]+)$/);
  if (job) return html`<${JobPage} id=${job[1]} key=${job[1]} />`;
  if (path === "/new") return html`<${NewJobPage} />`;
  if (path === "/chat") return html`<${ChatPage} />`;
  if (path === "/signin") return html`<${SignInPage} />`;
  return html`<div class="card"><h2>Not found</h2><p>No console page at ${path}. <${Link} href="/">Jobs</${Link}></p></div>`;
}

function App() {
  const { path } = useRoute();
  const [signedIn, setSignedIn] = useState(!!token.get());
  useEffect(
    () =>
      onUnauthorized(() => {
        setSignedIn(!!token.get());
        if (!location.pathname.endsWith("/signin")) {
          navigate(`/signin?next=${encodeURIComponent(location.pathname.slice(BASE.length) || "/")}`, { replace: true });
        }
      }),
    [],
  );
  useEffect(() => {
    const fn = () => setSignedIn(!!token.get());
    window.addEventListener("ncp-token", fn);
    return () => window.removeEventListener("ncp-token", fn);
  }, []);
  const nav = (href, label) => {
    const active = href === "/" ? path === "/" || path.startsWith("/jobs") : path.startsWith(href);
    return html`<${Link} href=${href} class=${active ? "active" : ""}>${label}</${Link}>`;
  };
  return html`
    <header class="topbar">
      <${Link} href="/" class="brand">nanochat<span>platform</span></${Link}>
      <nav>${nav("/", "Jobs")} ${nav("/new", "New job")} ${nav("/chat", "Chat")}</nav>
      <div class="spacer"></div>
      <${Link} href="/signin" class="signin-link" data-testid="signin-link">${signedIn ? "Signed in" : "Sign in"}</${Link}>
    </header>
    <main>${page(path)}</main>`;
}

const root = document.getElementById("app");
root.textContent = ""; // the "loading" note
render(html`<${App} />`, root);
