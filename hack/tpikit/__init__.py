"""Python helpers of hack/ shared by the demo (hack/demo.py), the test tiers and the benchmarks,
so that none of them imports another's code (the demo used to import tests/e2e/conftest.py).

- tpikit.kube: the local cluster's settings (from hack/lib/common.sh), kubectl, wait_until
- tpikit.provider: the e2e providers (local node, kind) and the real node's selector/tolerations
- tpikit.cluster: Kube, the operator's Helm release, the client pod, TPInferenceCluster helpers
- tpikit.kwok: kwok processes of a test's or a benchmark's own (a dead kubelet is one killed)
- tpikit.ports: free ports to listen on, below the ephemeral range
"""
