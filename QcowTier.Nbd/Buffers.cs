using System.Buffers;

namespace QcowTier.Nbd;

/// <summary>The one pool every buffer of the server comes from and returns to (a single place to swap it).</summary>
internal static class Buffers
{
    public static ArrayPool<byte> Pool => ArrayPool<byte>.Shared;
}
