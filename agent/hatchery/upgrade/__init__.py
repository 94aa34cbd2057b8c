"""Upgrades of a node to a new image: live patch (files in place, VMs untouched) or reboot."""
