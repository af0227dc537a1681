"""The wire layer shared by every Tandem process: versioned msgpack messages (`messages`), their
codec (`codec`), and typed ZeroMQ sockets (`sockets`, which alone imports pyzmq)."""
