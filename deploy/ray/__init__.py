"""Ray Serve deployment of loss-service (``deploy.ray.app:build``)."""
