"""The cluster scheduler role: admission, routing (prefix cache against load) and the worker
registry that workers publish to and the other roles read."""
