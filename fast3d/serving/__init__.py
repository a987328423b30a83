"""Serving: ``fast3d serve``, image-to-3D over HTTP on Ray Serve with dynamic batching
(:mod:`fast3d.serving.app`), the served models as batch pipelines
(:mod:`fast3d.serving.pipelines`), request parsing (:mod:`fast3d.serving.request`), metrics
(:mod:`fast3d.serving.metrics`) and the load test (:mod:`fast3d.serving.loadtest`)."""
