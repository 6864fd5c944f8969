"""The domain: what is served and where, with no Ray, torch or diffusers.

catalog (models and GPUs), config (the YAML file, the fleet file), planner (VRAM and time
estimates), placement (which pool hosts which variant), routing (which route serves a request),
specs (the config resolved per deployment), schemas and errors (what callers send and get), images
(untrusted input images). Every other layer imports from here; nothing here imports from them.
"""
