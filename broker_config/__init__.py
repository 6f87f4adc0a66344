"""Mosquitto configuration for FedSpine Fleet: templates shared with Ansible, the admin tool, a local broker."""
