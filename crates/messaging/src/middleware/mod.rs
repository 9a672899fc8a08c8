//! Middleware for the router: retry, timeout, correlation ids, deduplication, throttle, circuit breaker, delayed redelivery, panic recovery.
