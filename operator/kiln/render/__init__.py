"""Pure renderers: an LLMDeployment or LLMEngine (plus observed facts) in, child manifests and status out.

One module per child: `engine` (the LLMEngine a deployment needs), `build_job` (its build Job),
`serving` (Deployment or LeaderWorkerSet), `service`, and `status` (conditions and phases).
"""
