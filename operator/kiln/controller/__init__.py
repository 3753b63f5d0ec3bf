"""The Kiln operator: kopf handlers (`handlers`), reconcilers (`reconcile`), the API edge (`kube`),
metrics and the `kiln operator run` command (`cli`)."""
