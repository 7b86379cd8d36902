"""What crosses the wire, for every side of it: the Open Inference Protocol codec (``wire.oip``) and the way
error messages show a received JSON value (``wire.values``). numpy and the standard library only."""
