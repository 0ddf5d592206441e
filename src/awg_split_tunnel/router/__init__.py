"""The router's adapters: the loops that feed ``core.packet_router.PacketRouter`` from divert handles
(``divert_loop``), the router process's asyncio body with the packet tunnels' devices (``service``) and
the process itself with its pipe to the control plane (``process``). The decisions stay in ``core/``.
"""
