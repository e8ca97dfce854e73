"""A grpcio echo backend in its own process (so it can be SIGKILLed mid-call).
Usage: python backend_proc.py PORT NAME"""
import sys
import time

from lib import Backend

if __name__ == "__main__":
    port, name = int(sys.argv[1]), sys.argv[2]
    b = Backend(port, name=name, health=True)
    print("ready", flush=True)
    end = time.monotonic() + 600   # never outlive the test by much
    while time.monotonic() < end:
        time.sleep(0.5)
    b.stop()
