"""The contract between the TPI operator and the runtime: one home for every shared fact.

Pure standard library and fully typed, so both images install it (the operator's has no torch)
and both sides import the same names instead of keeping copies in step:

* ``env``: the rank pod's environment variable names;
* ``keys``: the ``tpi.dev/*`` labels and annotations, and the flag that carries the assigned batch;
* ``exitcodes``: the runtime's exit codes and what the operator does about each;
* ``tp_rule``: which tensor-parallel sizes can shard a model;
* ``ranks``: several ranks per pod: the rank arithmetic, the ranks per pod at a degraded size, the
  Lease name of each local rank;
* ``termination``: the termination message a pod of several ranks writes, and its parser;
* ``safetensors_header``: reading (and checking) a safetensors file's header, never its tensors;
* ``defaults``: ports and the heartbeat cadence.

docs/contracts.md describes the same interface for readers.
"""
