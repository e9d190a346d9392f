"""The `pagoda` command line and the launcher that starts any set of the four roles in one process."""
