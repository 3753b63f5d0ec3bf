"""Node GPU topology: NVLink islands from NVML, and the agent that publishes them on the Node."""
