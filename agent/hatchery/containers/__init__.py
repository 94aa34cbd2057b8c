"""Containers in appliance VMs (HyperVM): OCI archives, their store, single-use image tokens."""
