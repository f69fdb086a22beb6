"""Job schemas and queue names shared by the API and the workers."""
