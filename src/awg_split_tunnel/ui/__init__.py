"""The local web dashboard the daemon serves (docs/DASHBOARD.md): tunnels, live connections, rules, log."""
