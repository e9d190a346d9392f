"""Pooling models: a prompt in, one vector out (`/v1/embeddings`). params.py is torch-free (the
front roles read it); pooler.py reduces a request's hidden states on the worker."""
