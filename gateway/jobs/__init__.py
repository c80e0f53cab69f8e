"""Jobs: the record, the durable queue and the worker that runs them."""
