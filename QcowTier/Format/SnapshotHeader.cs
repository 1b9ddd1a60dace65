using System.Buffers.Binary;
using System.Text;
using QcowTier.Storage;

namespace QcowTier.Format;

/// <summary>
/// One entry of the qcow2 snapshot table (docs/interop/qcow2.txt, "Snapshots"): a fixed 40-byte part,
/// extra data, the id string and the name, the whole padded to 8 bytes. Extra data we do not know is
/// kept byte for byte, so rewriting the table never loses what a newer writer stored.
/// </summary>
internal sealed class SnapshotHeader
{
    private const int OffsetL1TableOffset = 0;
    private const int OffsetL1Size = 8;
    private const int OffsetIdSize = 12;
    private const int OffsetNameSize = 14;
    private const int OffsetDateSec = 16;
    private const int OffsetDateNsec = 20;
    private const int OffsetVmClock = 24;
    private const int OffsetVmStateSize = 32;
    private const int OffsetExtraDataSize = 36;
    public const int FixedSize = 40;

    // Extra data fields (all optional by size).
    private const int ExtraVmStateSizeLarge = 0;
    private const int ExtraDiskSize = 8;
    private const int ExtraIcount = 16;
    /// <summary>The extra data we write: vm_state_size_large, disk_size, icount (QEMU writes the same 24 bytes).</summary>
    public const int KnownExtraSize = 24;

    /// <summary>QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA.</summary>
    public const int MaxExtraData = 1024;

    /// <summary>QEMU's QCOW_MAX_SNAPSHOTS_SIZE.</summary>
    public const long MaxTableSize = 1024L * QcowHeader.MaxSnapshots;

    public long L1TableOffset { get; set; }
    public uint L1Size { get; set; }
    public string Id { get; set; } = "";
    public string Name { get; set; } = "";
    public uint DateSec { get; set; }
    public uint DateNsec { get; set; }
    public ulong VmClockNsec { get; set; }
    public long VmStateSize { get; set; }

    /// <summary>The guest disk size when the snapshot was taken (the current size for entries that predate the field).</summary>
    public long DiskSize { get; set; }

    /// <summary>Instruction count for record/replay; null when absent or -1 ("none").</summary>
    public long? Icount { get; set; }

    /// <summary>Extra data past the fields we know, preserved as read.</summary>
    public byte[] UnknownExtra { get; set; } = [];

    /// <summary>The size of the original extra data (the checker flags v3 entries with less than 16).</summary>
    public int ExtraDataSize { get; private set; } = KnownExtraSize;

    /// <summary>Reads the whole table; throws <see cref="QcowCorruptImageException"/> naming the entry when it cannot be used.</summary>
    public static List<SnapshotHeader> ReadTable(ImageStorage file, QcowHeader header, out long tableSize)
    {
        tableSize = 0;
        var list = new List<SnapshotHeader>();
        var count = header.NbSnapshots;
        if (count == 0)
        {
            return list;
        }
        if (count > QcowHeader.MaxSnapshots)
        {
            ThrowHelper.Corrupt(file.Name, QcowHeader.OffsetNbSnapshots, "nb_snapshots", $"snapshot table too large ({count} entries)");
        }
        if ((header.SnapshotsOffset & (header.ClusterSize - 1)) != 0 || header.SnapshotsOffset <= 0 || header.SnapshotsOffset >= file.Length)
        {
            ThrowHelper.Corrupt(file.Name, QcowHeader.OffsetSnapshotsOffset, "snapshots_offset", $"snapshot table offset 0x{header.SnapshotsOffset:x} invalid");
        }
        var pos = header.SnapshotsOffset;
        Span<byte> fixedPart = stackalloc byte[FixedSize];
        for (var i = 0; i < count; i++)
        {
            pos = (pos + 7) & ~7L;
            if (pos - header.SnapshotsOffset > MaxTableSize || pos + FixedSize > file.Length)
            {
                ThrowHelper.Corrupt(file.Name, pos, "snapshot table", $"snapshot table entry {i} lies past the end of the file or the table's size limit");
            }
            file.Read(pos, fixedPart);
            var sn = new SnapshotHeader
            {
                L1TableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(fixedPart[OffsetL1TableOffset..]),
                L1Size = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[OffsetL1Size..]),
                DateSec = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[OffsetDateSec..]),
                DateNsec = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[OffsetDateNsec..]),
                VmClockNsec = BinaryPrimitives.ReadUInt64BigEndian(fixedPart[OffsetVmClock..]),
                VmStateSize = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[OffsetVmStateSize..]),
            };
            int idSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[OffsetIdSize..]);
            int nameSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[OffsetNameSize..]);
            var extraSize = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[OffsetExtraDataSize..]);
            if (extraSize > MaxExtraData)
            {
                ThrowHelper.Corrupt(file.Name, pos + OffsetExtraDataSize, "extra_data_size", $"too much extra metadata in snapshot table entry {i} ({extraSize} bytes)");
            }
            var rest = new byte[extraSize + idSize + nameSize];
            if (pos + FixedSize + rest.Length > file.Length)
            {
                ThrowHelper.Corrupt(file.Name, pos, "snapshot table", $"snapshot table entry {i} lies past the end of the file");
            }
            file.Read(pos + FixedSize, rest);
            var extra = rest.AsSpan(0, (int)extraSize);
            sn.ExtraDataSize = (int)extraSize;
            if (extra.Length >= ExtraVmStateSizeLarge + 8)
            {
                sn.VmStateSize = (long)BinaryPrimitives.ReadUInt64BigEndian(extra[ExtraVmStateSizeLarge..]);
            }
            // An entry from before the field describes a disk of the current size (QEMU assumes the same).
            sn.DiskSize = extra.Length >= ExtraDiskSize + 8 ? (long)BinaryPrimitives.ReadUInt64BigEndian(extra[ExtraDiskSize..]) : header.Size;
            if (extra.Length >= ExtraIcount + 8)
            {
                var ic = (long)BinaryPrimitives.ReadUInt64BigEndian(extra[ExtraIcount..]);
                sn.Icount = ic < 0 ? null : ic;
            }
            if (extra.Length > KnownExtraSize)
            {
                sn.UnknownExtra = extra[KnownExtraSize..].ToArray();
            }
            sn.Id = Encoding.UTF8.GetString(rest, (int)extraSize, idSize);
            sn.Name = Encoding.UTF8.GetString(rest, (int)extraSize + idSize, nameSize);
            if (sn.L1Size > QcowHeader.MaxL1Bytes / 8)
            {
                ThrowHelper.Corrupt(file.Name, pos + OffsetL1Size, "l1_size", $"snapshot {sn.Id} ('{sn.Name}') has an L1 table of {sn.L1Size} entries, above qcow2's limit");
            }
            if ((sn.L1TableOffset & (header.ClusterSize - 1)) != 0 || sn.L1Size > 0 && sn.L1TableOffset < header.ClusterSize)
            {
                ThrowHelper.Corrupt(file.Name, pos + OffsetL1TableOffset, "l1_table_offset", $"snapshot {sn.Id} ('{sn.Name}') has an invalid L1 table offset 0x{sn.L1TableOffset:x}");
            }
            list.Add(sn);
            pos += FixedSize + rest.Length;
        }
        tableSize = pos - header.SnapshotsOffset;
        return list;
    }

    /// <summary>The bytes of a whole table (entries padded to 8 bytes, as QEMU lays them out).</summary>
    public static byte[] Serialize(IReadOnlyList<SnapshotHeader> list)
    {
        long size = 0;
        foreach (var sn in list)
        {
            size = (size + 7) & ~7L;
            size += sn.EncodedSize;
        }
        if (size > MaxTableSize)
        {
            throw new QcowException($"the snapshot table would take {size} bytes, above qcow2's limit of {MaxTableSize}");
        }
        var buf = new byte[size];
        var pos = 0;
        foreach (var sn in list)
        {
            pos = (pos + 7) & ~7;
            var e = buf.AsSpan(pos);
            var id = Encoding.UTF8.GetBytes(sn.Id);
            var name = Encoding.UTF8.GetBytes(sn.Name);
            var extraSize = KnownExtraSize + sn.UnknownExtra.Length;
            BinaryPrimitives.WriteUInt64BigEndian(e[OffsetL1TableOffset..], (ulong)sn.L1TableOffset);
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetL1Size..], sn.L1Size);
            BinaryPrimitives.WriteUInt16BigEndian(e[OffsetIdSize..], (ushort)id.Length);
            BinaryPrimitives.WriteUInt16BigEndian(e[OffsetNameSize..], (ushort)name.Length);
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetDateSec..], sn.DateSec);
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetDateNsec..], sn.DateNsec);
            BinaryPrimitives.WriteUInt64BigEndian(e[OffsetVmClock..], sn.VmClockNsec);
            // The 32-bit field holds the size when it fits; vm_state_size_large always holds it (as QEMU writes).
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetVmStateSize..], sn.VmStateSize <= uint.MaxValue ? (uint)sn.VmStateSize : 0);
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetExtraDataSize..], (uint)extraSize);
            var extra = e[FixedSize..];
            BinaryPrimitives.WriteUInt64BigEndian(extra[ExtraVmStateSizeLarge..], (ulong)sn.VmStateSize);
            BinaryPrimitives.WriteUInt64BigEndian(extra[ExtraDiskSize..], (ulong)sn.DiskSize);
            BinaryPrimitives.WriteUInt64BigEndian(extra[ExtraIcount..], sn.Icount is { } ic ? (ulong)ic : ulong.MaxValue);
            sn.UnknownExtra.CopyTo(extra[KnownExtraSize..]);
            id.CopyTo(extra[extraSize..]);
            name.CopyTo(extra[(extraSize + id.Length)..]);
            pos += sn.EncodedSize;
        }
        return buf;
    }

    private int EncodedSize => FixedSize + KnownExtraSize + UnknownExtra.Length + Encoding.UTF8.GetByteCount(Id) + Encoding.UTF8.GetByteCount(Name);
}
