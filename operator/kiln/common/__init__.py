"""What the operator, the autoscaler and the demo share: histogram quantiles, the parse of an engine's
/metrics, and Lease leader election. Depends on no other part of `kiln`, so any component may use it."""
