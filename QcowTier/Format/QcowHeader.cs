using System.Buffers.Binary;
using System.Text;

namespace QcowTier.Format;

/// <summary>
/// The qcow2 header (docs/interop/qcow2.txt, "Header"). All fields are big-endian.
/// Only the fields this engine updates are ever rewritten, one by one, so unknown
/// header fields and extensions survive every write.
/// </summary>
internal sealed class QcowHeader
{
    public const uint Magic = 0x514649fb; // "QFI\xfb"

    public const int OffsetMagic = 0;
    public const int OffsetVersion = 4;
    public const int OffsetBackingFileOffset = 8;
    public const int OffsetBackingFileSize = 16;
    public const int OffsetClusterBits = 20;
    public const int OffsetSize = 24;
    public const int OffsetCryptMethod = 32;
    public const int OffsetL1Size = 36;
    public const int OffsetL1TableOffset = 40;
    public const int OffsetRefcountTableOffset = 48;
    public const int OffsetRefcountTableClusters = 56;
    public const int OffsetNbSnapshots = 60;
    public const int OffsetSnapshotsOffset = 64;
    public const int OffsetIncompatibleFeatures = 72;
    public const int OffsetCompatibleFeatures = 80;
    public const int OffsetAutoclearFeatures = 88;
    public const int OffsetRefcountOrder = 96;
    public const int OffsetHeaderLength = 100;
    public const int OffsetCompressionType = 104;

    public const int V2Length = 72;
    public const int V3MinLength = 104;
    public const int V3Length = 112;

    public const ulong IncompatDirty = 1UL << 0;
    public const ulong IncompatCorrupt = 1UL << 1;
    public const ulong IncompatExternalDataFile = 1UL << 2;
    public const ulong IncompatCompressionType = 1UL << 3;
    public const ulong IncompatExtendedL2 = 1UL << 4;
    public const ulong CompatLazyRefcounts = 1UL << 0;
    public const ulong AutoclearBitmaps = 1UL << 0;
    public const ulong AutoclearDataFileRaw = 1UL << 1;

    /// <summary>QEMU's BDRV_SECTOR_SIZE: virtual sizes are whole sectors.</summary>
    public const int SectorSize = 512;

    public const int MinClusterBits = 9;
    public const int MaxClusterBits = 21;

    /// <summary>QEMU's QCOW_MAX_L1_SIZE: the largest L1 table it accepts, in bytes.</summary>
    public const long MaxL1Bytes = 32L * 1024 * 1024;
    /// <summary>QEMU's QCOW_MAX_REFTABLE_SIZE, in bytes.</summary>
    public const long MaxRefcountTableBytes = 8L * 1024 * 1024;
    /// <summary>QEMU's QCOW_MAX_SNAPSHOTS.</summary>
    public const int MaxSnapshots = 65536;
    /// <summary>QEMU refuses virtual sizes above 2^63 - 1; the format stores bytes, we cap at 2^62 so arithmetic cannot overflow.</summary>
    public const long MaxVirtualSize = 1L << 62;

    public uint Version { get; set; }
    public ulong BackingFileOffset { get; set; }
    public uint BackingFileSize { get; set; }
    public int ClusterBits { get; set; }
    public long Size { get; set; }
    public uint CryptMethod { get; set; }
    public uint L1Size { get; set; }
    public long L1TableOffset { get; set; }
    public long RefcountTableOffset { get; set; }
    public uint RefcountTableClusters { get; set; }
    public uint NbSnapshots { get; set; }
    public long SnapshotsOffset { get; set; }
    public ulong IncompatibleFeatures { get; set; }
    public ulong CompatibleFeatures { get; set; }
    public ulong AutoclearFeatures { get; set; }
    public int RefcountOrder { get; set; } = 4;
    public int HeaderLength { get; set; }
    public byte CompressionType { get; set; }
    public List<HeaderExtension> Extensions { get; } = [];

    public int ClusterSize => 1 << ClusterBits;
    public int RefcountBits => 1 << RefcountOrder;

    public string? FeatureName(int type, int bit)
    {
        foreach (var ext in Extensions)
        {
            if (ext.Type != HeaderExtension.FeatureNameTable)
            {
                continue;
            }
            var data = ext.Data;
            for (var i = 0; i + 48 <= data.Length; i += 48)
            {
                if (data[i] == type && data[i + 1] == bit)
                {
                    var name = data.AsSpan(i + 2, 46);
                    var len = name.IndexOf((byte)0);
                    return Encoding.UTF8.GetString(len < 0 ? name : name[..len]);
                }
            }
        }
        return null;
    }

    /// <summary>
    /// Names the incompatible features in <paramref name="mask"/> exactly as QEMU's report_unsupported_feature
    /// does: the feature name table's entries in table order (up to the first unnamed entry), then whatever
    /// bits remain as one "Unknown incompatible feature: &lt;hex mask&gt;".
    /// </summary>
    public string DescribeIncompatible(ulong mask)
    {
        var parts = new List<string>();
        var table = Extensions.FirstOrDefault(e => e.Type == HeaderExtension.FeatureNameTable)?.Data ?? [];
        for (var i = 0; i + 48 <= table.Length && table[i + 2] != 0; i += 48)
        {
            if (table[i] != 0 || table[i + 1] >= 64 || (mask & (1UL << table[i + 1])) == 0)
            {
                continue;
            }
            var name = table.AsSpan(i + 2, 46);
            var len = name.IndexOf((byte)0);
            parts.Add(Encoding.UTF8.GetString(len < 0 ? name : name[..len]));
            mask &= ~(1UL << table[i + 1]);
        }
        if (mask != 0)
        {
            parts.Add($"Unknown incompatible feature: {mask:x}");
        }
        return string.Join(", ", parts);
    }

    /// <summary>Parses and validates the header and its extensions from the first cluster of the file.</summary>
    /// <param name="buf">At least the first 64 KiB of the file, or the whole file when smaller.</param>
    /// <param name="fileLength">The length of the file, to bound every offset.</param>
    /// <param name="file">The file's name for messages.</param>
    public static QcowHeader Parse(ReadOnlySpan<byte> buf, long fileLength, string? file)
    {
        if (buf.Length < V2Length)
        {
            ThrowHelper.Corrupt(file, 0, "header", $"the file is {buf.Length} bytes, shorter than a qcow2 header ({V2Length} bytes)");
        }
        if (BinaryPrimitives.ReadUInt32BigEndian(buf) != Magic)
        {
            ThrowHelper.Format(file, OffsetMagic, "magic", "not a qcow2 image (bad magic)");
        }
        var h = new QcowHeader
        {
            Version = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetVersion..]),
        };
        if (h.Version is < 2 or > 3)
        {
            ThrowHelper.Unsupported(file, OffsetVersion, "version", $"unsupported qcow2 version {h.Version}");
        }
        h.BackingFileOffset = BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetBackingFileOffset..]);
        h.BackingFileSize = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetBackingFileSize..]);
        var clusterBits = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetClusterBits..]);
        if (clusterBits is < MinClusterBits or > MaxClusterBits)
        {
            ThrowHelper.Corrupt(file, OffsetClusterBits, "cluster_bits", $"cluster_bits {clusterBits} is outside 9..21 (512 B to 2 MiB clusters)");
        }
        h.ClusterBits = (int)clusterBits;
        var size = BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetSize..]);
        if (size > MaxVirtualSize)
        {
            ThrowHelper.Corrupt(file, OffsetSize, "size", $"virtual size {size} is too large");
        }
        h.Size = (long)size;
        h.CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetCryptMethod..]);
        h.L1Size = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetL1Size..]);
        h.L1TableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetL1TableOffset..]);
        h.RefcountTableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetRefcountTableOffset..]);
        h.RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetRefcountTableClusters..]);
        h.NbSnapshots = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetNbSnapshots..]);
        h.SnapshotsOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetSnapshotsOffset..]);

        if (h.Version == 2)
        {
            h.HeaderLength = V2Length;
            h.RefcountOrder = 4;
        }
        else
        {
            if (buf.Length < V3MinLength)
            {
                ThrowHelper.Corrupt(file, 0, "header", $"the file is {buf.Length} bytes, shorter than a version 3 header");
            }
            h.IncompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetIncompatibleFeatures..]);
            h.CompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetCompatibleFeatures..]);
            h.AutoclearFeatures = BinaryPrimitives.ReadUInt64BigEndian(buf[OffsetAutoclearFeatures..]);
            var order = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetRefcountOrder..]);
            if (order > 6)
            {
                ThrowHelper.Corrupt(file, OffsetRefcountOrder, "refcount_order", $"refcount_order {order} is above 6 (64-bit refcounts)");
            }
            h.RefcountOrder = (int)order;
            var hlen = BinaryPrimitives.ReadUInt32BigEndian(buf[OffsetHeaderLength..]);
            if (hlen < V3MinLength || hlen > h.ClusterSize || hlen % 8 != 0)
            {
                ThrowHelper.Corrupt(file, OffsetHeaderLength, "header_length", $"header_length {hlen} is invalid (must be a multiple of 8, at least 104 and within the first cluster)");
            }
            h.HeaderLength = (int)hlen;
            if (hlen > OffsetCompressionType)
            {
                if (buf.Length <= OffsetCompressionType)
                {
                    ThrowHelper.Corrupt(file, 0, "header", "the file ends inside the header");
                }
                h.CompressionType = buf[OffsetCompressionType];
            }
        }
        if (buf.Length < h.HeaderLength)
        {
            ThrowHelper.Corrupt(file, 0, "header", $"the file ends inside the {h.HeaderLength}-byte header");
        }

        h.ParseExtensions(buf, file);
        h.ValidateLayout(fileLength, file);
        return h;
    }

    private void ParseExtensions(ReadOnlySpan<byte> buf, string? file)
    {
        // Extensions live between the header and the end of cluster 0 (or the backing file name).
        long end = ClusterSize;
        if (BackingFileOffset != 0 && BackingFileOffset < (ulong)end)
        {
            end = (long)BackingFileOffset;
        }
        end = Math.Min(end, buf.Length);
        long pos = HeaderLength;
        var seen = 0;
        while (true)
        {
            if (pos + 8 > end)
            {
                // QEMU accepts a header whose extension area is cut short by the cluster's end without an end marker.
                break;
            }
            var type = BinaryPrimitives.ReadUInt32BigEndian(buf[(int)pos..]);
            var len = BinaryPrimitives.ReadUInt32BigEndian(buf[(int)(pos + 4)..]);
            if (type == HeaderExtension.EndMarker)
            {
                break;
            }
            if (len > end - pos - 8)
            {
                ThrowHelper.Corrupt(file, pos + 4, "header extension length", $"header extension 0x{type:x8} claims {len} bytes, beyond the end of the header cluster");
            }
            if (++seen > 1024)
            {
                ThrowHelper.Corrupt(file, pos, "header extensions", "more than 1024 header extensions");
            }
            Extensions.Add(new HeaderExtension(type, buf.Slice((int)pos + 8, (int)len).ToArray(), pos));
            pos += 8 + ((len + 7) & ~7u);
        }
    }

    private void ValidateLayout(long fileLength, string? file)
    {
        var cs = ClusterSize;
        if (L1Size > MaxL1Bytes / 8)
        {
            ThrowHelper.Corrupt(file, OffsetL1Size, "l1_size", $"L1 table of {L1Size} entries is too large (QEMU's limit is {MaxL1Bytes / 8})");
        }
        var l2Entries = cs / ((IncompatibleFeatures & IncompatExtendedL2) != 0 ? 16 : 8);
        var needed = CeilDiv(Size, (long)cs * l2Entries);
        if (L1Size < needed)
        {
            ThrowHelper.Corrupt(file, OffsetL1Size, "l1_size", $"L1 table of {L1Size} entries is too small for a virtual size of {Size} bytes ({needed} needed)");
        }
        if (L1Size > 0)
        {
            CheckTable(L1TableOffset, (long)L1Size * 8, fileLength, OffsetL1TableOffset, "l1_table_offset", file);
        }
        if (RefcountTableClusters == 0 || (long)RefcountTableClusters * cs > MaxRefcountTableBytes)
        {
            ThrowHelper.Corrupt(file, OffsetRefcountTableClusters, "refcount_table_clusters", $"refcount table of {RefcountTableClusters} clusters is invalid (1..{MaxRefcountTableBytes / cs})");
        }
        CheckTable(RefcountTableOffset, (long)RefcountTableClusters * cs, fileLength, OffsetRefcountTableOffset, "refcount_table_offset", file);
        if (NbSnapshots > MaxSnapshots)
        {
            ThrowHelper.Corrupt(file, OffsetNbSnapshots, "nb_snapshots", $"{NbSnapshots} snapshots is above QEMU's limit of {MaxSnapshots}");
        }
        if (BackingFileOffset != 0 && (BackingFileOffset >= (ulong)cs || BackingFileSize > 1023 || BackingFileOffset + BackingFileSize > (ulong)cs))
        {
            ThrowHelper.Corrupt(file, OffsetBackingFileOffset, "backing_file_offset", "the backing file name does not lie within the first cluster or is longer than 1023 bytes");
        }
    }

    private void CheckTable(long offset, long bytes, long fileLength, int field, string name, string? file)
    {
        if (offset <= 0 || (offset & (ClusterSize - 1)) != 0)
        {
            ThrowHelper.Corrupt(file, field, name, $"table offset 0x{offset:x} is not a non-zero multiple of the cluster size {ClusterSize}");
        }
        if (offset > fileLength || bytes > fileLength - offset)
        {
            ThrowHelper.Corrupt(file, field, name, $"table [0x{offset:x}, +{bytes}) lies beyond the end of the file ({fileLength} bytes)");
        }
    }

    public static long CeilDiv(long a, long b) => (a + b - 1) / b;

    /// <summary>Serializes a fresh header with its extensions into cluster 0 of a new image.</summary>
    public void WriteNew(Span<byte> cluster0)
    {
        cluster0.Clear();
        BinaryPrimitives.WriteUInt32BigEndian(cluster0[OffsetMagic..], Magic);
        BinaryPrimitives.WriteUInt32BigEndian(cluster0[OffsetVersion..], Version);
        BinaryPrimitives.WriteUInt32BigEndian(cluster0[OffsetClusterBits..], (uint)ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(cluster0[OffsetSize..], (ulong)Size);
        BinaryPrimitives.WriteUInt32BigEndian(cluster0[OffsetL1Size..], L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(cluster0[OffsetL1TableOffset..], (ulong)L1TableOffset);
        BinaryPrimitives.WriteUInt64BigEndian(cluster0[OffsetRefcountTableOffset..], (ulong)RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(cluster0[OffsetRefcountTableClusters..], RefcountTableClusters);
        int pos;
        if (Version >= 3)
        {
            BinaryPrimitives.WriteUInt64BigEndian(cluster0[OffsetIncompatibleFeatures..], IncompatibleFeatures);
            BinaryPrimitives.WriteUInt64BigEndian(cluster0[OffsetCompatibleFeatures..], CompatibleFeatures);
            BinaryPrimitives.WriteUInt64BigEndian(cluster0[OffsetAutoclearFeatures..], AutoclearFeatures);
            BinaryPrimitives.WriteUInt32BigEndian(cluster0[OffsetRefcountOrder..], (uint)RefcountOrder);
            BinaryPrimitives.WriteUInt32BigEndian(cluster0[OffsetHeaderLength..], V3Length);
            cluster0[OffsetCompressionType] = CompressionType;
            pos = V3Length;
        }
        else
        {
            pos = V2Length;
        }
        foreach (var ext in Extensions)
        {
            BinaryPrimitives.WriteUInt32BigEndian(cluster0[pos..], ext.Type);
            BinaryPrimitives.WriteUInt32BigEndian(cluster0[(pos + 4)..], (uint)ext.Data.Length);
            ext.Data.CopyTo(cluster0[(pos + 8)..]);
            pos += 8 + ((ext.Data.Length + 7) & ~7);
        }
        // End-of-extensions marker is the zeroed 8 bytes that follow.
    }
}
