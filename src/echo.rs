//! The echo test service (placeholder; being written).
