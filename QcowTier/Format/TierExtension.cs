using System.Buffers.Binary;
using System.Text;

namespace QcowTier.Format;

/// <summary>
/// The "TIER" header extension of a tiered image (docs/FORMAT.md, "Tiered layout"). It lives in
/// cluster 0 like every header extension and is found by its type, never by its position.
/// </summary>
internal sealed class TierExtension
{
    public const uint Type = 0x54494552; // "TIER"
    public const uint CurrentVersion = 1;

    /// <summary>The incompatible feature bit that makes QEMU refuse a tiered image instead of misreading it.</summary>
    public const int IncompatBit = 63;
    public const ulong IncompatMask = 1UL << IncompatBit;
    public const string FeatureName = "QcowTier tiered layout";

    /// <summary>Standard L2 entries: the cluster lives in the HDD data file.</summary>
    public const ulong L2HddBit = 1UL << 61;
    /// <summary>Compressed L2 entries (bit 63 is otherwise always zero for them): the cluster lives in the HDD data file.</summary>
    public const ulong CompressedHddBit = 1UL << 63;

    public const int OffsetVersion = 0;
    public const int OffsetFlags = 4;
    public const int OffsetUuid = 8;
    public const int OffsetHddRefcountTableOffset = 24;
    public const int OffsetHddRefcountTableClusters = 32;
    public const int OffsetHintsCount = 36;
    public const int OffsetHintsOffset = 40;
    public const int OffsetSsdBudget = 48;
    public const int OffsetNameLength = 56;
    public const int OffsetName = 58;
    public const int MaxNameLength = 1023;

    public const uint FlagDefaultHdd = 1;

    /// <summary>At most this many pinned ranges (bounds the hints table to 24 MiB).</summary>
    public const int MaxHints = 1 << 20;
    public const int HintEntrySize = 24;

    public uint Version { get; set; } = CurrentVersion;
    public uint Flags { get; set; }
    public Guid Uuid { get; set; }
    public long HddRefcountTableOffset { get; set; }
    public uint HddRefcountTableClusters { get; set; }
    public uint HintsCount { get; set; }
    public long HintsOffset { get; set; }
    public long SsdBudget { get; set; }
    public string DataFileName { get; set; } = "";

    public static TierExtension Parse(ReadOnlySpan<byte> data, long extOffset, string? file)
    {
        if (data.Length < OffsetName)
        {
            ThrowHelper.Corrupt(file, extOffset, "TIER extension", $"the tier extension is {data.Length} bytes, shorter than its {OffsetName}-byte fixed part");
        }
        var t = new TierExtension
        {
            Version = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetVersion..]),
            Flags = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetFlags..]),
            Uuid = new Guid(data.Slice(OffsetUuid, 16), bigEndian: true),
            HddRefcountTableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(data[OffsetHddRefcountTableOffset..]),
            HddRefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetHddRefcountTableClusters..]),
            HintsCount = BinaryPrimitives.ReadUInt32BigEndian(data[OffsetHintsCount..]),
            HintsOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(data[OffsetHintsOffset..]),
            SsdBudget = (long)BinaryPrimitives.ReadUInt64BigEndian(data[OffsetSsdBudget..]),
        };
        if (t.Version != CurrentVersion)
        {
            ThrowHelper.Unsupported(file, extOffset + 8 + OffsetVersion, "TIER version", $"tier extension version {t.Version} is not supported (this QcowTier reads version {CurrentVersion})");
        }
        var nameLen = BinaryPrimitives.ReadUInt16BigEndian(data[OffsetNameLength..]);
        if (nameLen == 0 || nameLen > MaxNameLength || OffsetName + nameLen > data.Length)
        {
            ThrowHelper.Corrupt(file, extOffset + 8 + OffsetNameLength, "TIER data file name length", $"data file name length {nameLen} is invalid (1..{MaxNameLength}, within the extension)");
        }
        t.DataFileName = Encoding.UTF8.GetString(data.Slice(OffsetName, nameLen));
        if (t.HintsCount > MaxHints)
        {
            ThrowHelper.Corrupt(file, extOffset + 8 + OffsetHintsCount, "TIER hints count", $"{t.HintsCount} pinned ranges is above the limit of {MaxHints}");
        }
        if (t.SsdBudget < 0)
        {
            ThrowHelper.Corrupt(file, extOffset + 8 + OffsetSsdBudget, "TIER ssd budget", "the SSD budget is negative");
        }
        return t;
    }

    public byte[] Serialize()
    {
        var name = Encoding.UTF8.GetBytes(DataFileName);
        if (name.Length is 0 or > MaxNameLength)
        {
            throw new ArgumentException($"the data file name must be 1 to {MaxNameLength} bytes of UTF-8");
        }
        var data = new byte[OffsetName + name.Length];
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(OffsetVersion), Version);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(OffsetFlags), Flags);
        Uuid.TryWriteBytes(data.AsSpan(OffsetUuid, 16), bigEndian: true, out _);
        BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(OffsetHddRefcountTableOffset), (ulong)HddRefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(OffsetHddRefcountTableClusters), HddRefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(OffsetHintsCount), HintsCount);
        BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(OffsetHintsOffset), (ulong)HintsOffset);
        BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(OffsetSsdBudget), (ulong)SsdBudget);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(OffsetNameLength), (ushort)name.Length);
        name.CopyTo(data.AsSpan(OffsetName));
        return data;
    }
}

/// <summary>
/// The header at the start of the HDD data file: it names the image that owns the file, so a wrong
/// or swapped file is refused instead of read.
/// </summary>
internal static class TierDataFileHeader
{
    public const ulong Magic = 0x5154494552484444; // "QTIERHDD"
    public const uint CurrentVersion = 1;
    public const int OffsetMagic = 0;
    public const int OffsetVersion = 8;
    public const int OffsetClusterBits = 12;
    public const int OffsetUuid = 16;
    public const int Length = 32;

    public static byte[] Build(Guid uuid, int clusterBits, int clusterSize)
    {
        var b = new byte[clusterSize];
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(OffsetMagic), Magic);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(OffsetVersion), CurrentVersion);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(OffsetClusterBits), (uint)clusterBits);
        uuid.TryWriteBytes(b.AsSpan(OffsetUuid, 16), bigEndian: true, out _);
        return b;
    }

    public static void Validate(ReadOnlySpan<byte> b, Guid expected, int clusterBits, string? file, string? image)
    {
        if (b.Length < Length || BinaryPrimitives.ReadUInt64BigEndian(b) != Magic)
        {
            ThrowHelper.Format(file, OffsetMagic, "tier data file magic", $"not a QcowTier HDD data file (bad magic); it is named as the tier data file of {image ?? "the image"}");
        }
        var version = BinaryPrimitives.ReadUInt32BigEndian(b[OffsetVersion..]);
        if (version != CurrentVersion)
        {
            ThrowHelper.Unsupported(file, OffsetVersion, "tier data file version", $"tier data file version {version} is not supported");
        }
        var uuid = new Guid(b.Slice(OffsetUuid, 16), bigEndian: true);
        if (uuid != expected)
        {
            ThrowHelper.Format(file, OffsetUuid, "tier data file uuid", $"the tier data file belongs to image {uuid}, not to {image ?? "this image"} ({expected}): wrong or swapped data file");
        }
        var bits = BinaryPrimitives.ReadUInt32BigEndian(b[OffsetClusterBits..]);
        if (bits != clusterBits)
        {
            ThrowHelper.Corrupt(file, OffsetClusterBits, "tier data file cluster_bits", $"the tier data file says cluster_bits {bits}, the image {clusterBits}");
        }
    }
}
