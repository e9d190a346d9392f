"""What the roles share on the wire: the bus (RabbitMQ or in memory), the metadata store (Redis or
in memory), the messages, and the OpenAI-style error they carry."""
