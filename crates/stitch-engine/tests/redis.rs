//! Debian redis-server under redis-benchmark (see redis_server_under_load).
