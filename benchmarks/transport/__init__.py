"""Transport benchmark: chunked transfer vs raw single-message mosquitto throughput."""
