"""Cluster configs (cluster launcher, KubeRay) and the local simulated GPU fleet."""
