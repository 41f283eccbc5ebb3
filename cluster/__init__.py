"""renderfarm.cluster: the scheduler (gRPC server, job store, planner, dispatcher, result store)."""
