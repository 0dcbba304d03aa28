"""Everything that crosses a wire: control messages, air messages, the frame format and the update codec."""
