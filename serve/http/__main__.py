"""`python -m serve.http BUNDLE [BUNDLE ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]`: the HTTP server."""

from serve.http.cli import main

if __name__ == "__main__":
    main()
