"""Usage sinks: where `UsageEvent`s go. Sinks fail open: a slow or dead sink never touches a request."""
