"""Ray: the local session on loopback, its reaper, and Ray Jobs on a cluster."""
