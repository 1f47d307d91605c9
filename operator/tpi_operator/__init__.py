"""TPI operator: reconciles TPInferenceCluster objects into StatefulSets of rank pods."""
