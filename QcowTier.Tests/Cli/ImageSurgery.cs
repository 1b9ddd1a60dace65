using System.Buffers.Binary;

namespace QcowTier.Tests.Cli;

/// <summary>Damages qcow2 files on purpose, straight through their on-disk structures.</summary>
internal static class ImageSurgery
{
    private static ulong ReadU64(FileStream f, long offset)
    {
        Span<byte> b = stackalloc byte[8];
        f.Position = offset;
        f.ReadExactly(b);
        return BinaryPrimitives.ReadUInt64BigEndian(b);
    }

    private static void WriteBytes(string path, long offset, ReadOnlySpan<byte> bytes)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        f.Position = offset;
        f.Write(bytes);
    }

    public static long L1Offset(string path)
    {
        using var f = File.OpenRead(path);
        return (long)ReadU64(f, 40);
    }

    /// <summary>Host offset of the first L2 table (L1 entry 0).</summary>
    public static long FirstL2(string path)
    {
        using var f = File.OpenRead(path);
        var l1 = (long)ReadU64(f, 40);
        return (long)(ReadU64(f, l1) & 0x00fffffffffffe00UL);
    }

    /// <summary>Clears L2 entries so their clusters stay referenced by the refcounts only: leaks.</summary>
    public static void ClearL2Entries(string path, int first, int count)
        => WriteBytes(path, FirstL2(path) + first * 8L, new byte[count * 8]);

    /// <summary>Sets a 16-bit refcount in the first refcount block (cluster index in the file).</summary>
    public static void SetRefcount(string path, long cluster, ushort value)
    {
        long block;
        using (var f = File.OpenRead(path))
        {
            var table = (long)ReadU64(f, 48);
            block = (long)(ReadU64(f, table) & ~0x1FFUL);
        }
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16BigEndian(b, value);
        WriteBytes(path, block + cluster * 2, b);
    }

    /// <summary>The host cluster index of the first data cluster (L2 entry 0).</summary>
    public static long FirstDataCluster(string path, int clusterBits = 16)
    {
        using var f = File.OpenRead(path);
        return (long)(ReadU64(f, FirstL2(path)) & 0x00fffffffffffe00UL) >> clusterBits;
    }

    /// <summary>Sets a bit of the header's incompatible features (offset 72, version 3).</summary>
    public static void SetIncompatibleBit(string path, int bit)
    {
        ulong v;
        using (var f = File.OpenRead(path))
        {
            v = ReadU64(f, 72);
        }
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, v | (1UL << bit));
        WriteBytes(path, 72, b);
    }

    public static void Overwrite(string path, long offset, params byte[] bytes) => WriteBytes(path, offset, bytes);
}
