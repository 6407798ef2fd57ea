"""Protected services: started in order on the active, stopped on passives, watched by checks.

``config`` holds their configuration, ``control`` the seam that starts and stops one service
(supervised process, commands, systemd unit), ``health`` the probes, ``rules`` what to do
about failed probes, and ``manager`` ties them together for the agent.
"""

# Nothing is re-exported: importing the configuration (the CLI does) must not load the
# probes and their HTTP client.
