"""renderfarm.actors: Ray actors for each pipeline stage, around plain functions that run without Ray."""
