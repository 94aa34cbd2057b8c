"""VMs: the lifecycle model, QEMU processes controlled over QMP, and the manager."""
