"""`tandem serve`: the OpenAI-compatible server (this process) over one engine process."""
