// Sign in: the API's bearer token (NCP_API_TOKEN), kept in this browser tab's sessionStorage.

import { useEffect, useState } from "preact/hooks";
import { api, ApiError, token } from "../api.js";
import { html, navigate, useRoute } from "../ui.js";

const announce = () => window.dispatchEvent(new Event("ncp-token"));

export function SignInPage() {
  const { query } = useRoute();
  const next = query.get("next") || "/";
  const [needsToken, setNeedsToken] = useState(null);
  const [value, setValue] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const [signedIn, setSignedIn] = useState(!!token.get());

  useEffect(() => {
    // Ask without the token: 401 means this API is protected; 200 means it serves without one.
    fetch("/jobs?limit=1").then((r) => setNeedsToken(r.status === 401), () => setNeedsToken(null));
  }, []);

  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    token.set(value.trim());
    try {
      await api("/jobs", { params: { limit: 1 } });
      announce();
      navigate(next, { replace: true });
    } catch (err) {
      token.clear();
      announce();
      setError(err instanceof ApiError && err.status === 401 ? "The API refused this token." : err.message);
    } finally {
      setBusy(false);
    }
  };

  const signOut = () => {
    token.clear();
    announce();
    setSignedIn(false);
  };

  return html`<div class="card narrow signin">
    <h2>Sign in</h2>
    ${needsToken === false &&
    html`<p class="ok-note" data-testid="no-token-needed">This API has no token configured: it serves local
      connections only, and the console needs no sign-in. <a href="/console/">Go to the jobs</a>.</p>`}
    ${needsToken === true &&
    html`<p>This API requires its bearer token (<code>NCP_API_TOKEN</code>). It is kept in this tab only
      (sessionStorage) and sent with every request.</p>`}
    ${signedIn
      ? html`<p>You are signed in. <button class="btn" onClick=${signOut} data-testid="signout">Sign out</button></p>`
      : html`<form onSubmit=${submit}>
          <label for="token">API token</label>
          <input id="token" name="token" type="password" autocomplete="current-password" value=${value}
            onInput=${(e) => setValue(e.target.value)} required />
          ${error && html`<p class="field-error" role="alert" data-testid="signin-error">${error}</p>`}
          <button class="btn primary" type="submit" disabled=${busy}>Sign in</button>
        </form>`}
  </div>`;
}
