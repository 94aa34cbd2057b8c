"""Hatchery: the hypervisor agent and the operator CLI."""
