"""What every binary runs on: devices and processes, atomic outputs, flags shared by binaries."""
