"""The router: the OpenAI frontend over a cluster of workers."""
