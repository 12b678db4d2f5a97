"""Tools built on controllers: heat-map tracing (attnctl.trace), plots."""
