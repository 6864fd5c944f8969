"""The OpenAI images API over HTTP, and the ingress deployment that serves it in front of the router.

- ``routes``: the routes over the router (``create_api``), and what they need of it (``ImageService``);
- ``middlewares``: the API-key check and the body limits, in front of the routes;
- ``forms``: the edit route's multipart form, parsed under limits;
- ``sse``: Server-Sent Events of a streamed request;
- ``errors``: error answers made at the HTTP layer;
- ``openapi``: what the schema says beyond FastAPI's own;
- ``ingress``: the router deployment with this API in front (``build_ingress``).
"""
