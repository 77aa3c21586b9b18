"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) over the serving engine."""
