"""`python -m serve BUNDLE_OR_RUN [...] [--host 127.0.0.1] [--port N] [--share] [--auth-file PATH]`: the Gradio demo."""

from serve.app import main

if __name__ == "__main__":
    main()
