using System.Buffers.Binary;
using System.Text;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>One internal snapshot as the checker needs it (docs/interop/qcow2.txt, "Snapshots").</summary>
internal sealed record SnapshotEntry(int Index, string Id, string Name, ulong L1TableOffset, uint L1Size, uint ExtraDataSize);

/// <summary>Reads the snapshot table: variable-length entries, each starting on an 8-byte boundary.</summary>
internal static class SnapshotTable
{
    /// <summary>Fixed part of an entry: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size.</summary>
    public const int EntryHeaderSize = 40;
    /// <summary>QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA.</summary>
    public const uint MaxExtraData = 1024;
    /// <summary>QEMU's QCOW_MAX_SNAPSHOTS_SIZE: 1 KiB per snapshot on average.</summary>
    public const long MaxTableSize = 1024L * QcowHeader.MaxSnapshots;
    /// <summary>v3 entries carry at least vm_state_size_large and disk_size.</summary>
    public const uint MinV3ExtraData = 16;

    /// <summary>
    /// Reads every entry. Returns null with <paramref name="error"/> set when the table cannot be used
    /// at all (QEMU then fails the check); <paramref name="tableSize"/> is the bytes the table spans.
    /// </summary>
    public static List<SnapshotEntry>? Read(ImageStorage file, QcowHeader header, out long tableSize, out string? error)
    {
        tableSize = 0;
        error = null;
        var count = header.NbSnapshots;
        var start = (ulong)header.SnapshotsOffset;
        var cs = (ulong)header.ClusterSize;
        if (count > QcowHeader.MaxSnapshots)
        {
            error = "ERROR snapshot table too large";
            return null;
        }
        if ((ulong)long.MaxValue - count * EntryHeaderSize < start)
        {
            error = "ERROR snapshot table exceeds the maximum supported size";
            return null;
        }
        if ((start & (cs - 1)) != 0)
        {
            error = "ERROR snapshot table offset invalid";
            return null;
        }
        var list = new List<SnapshotEntry>((int)Math.Min(count, 1024));
        if (count == 0)
        {
            return list;
        }
        Span<byte> fixedPart = stackalloc byte[EntryHeaderSize];
        var pos = (long)start;
        long length = 0;
        for (var i = 0; i < count; i++)
        {
            pos = (pos + 7) & ~7L;
            length = (length + 7) & ~7L;
            CheckIo.ReadZeroPadded(file, (ulong)pos, fixedPart);
            var l1Offset = BinaryPrimitives.ReadUInt64BigEndian(fixedPart);
            var l1Size = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[8..]);
            var idSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[12..]);
            var nameSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[14..]);
            var extra = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[36..]);
            if (extra > MaxExtraData)
            {
                error = $"ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry {i}";
                return null;
            }
            pos += EntryHeaderSize + extra;
            var id = ReadString(file, pos, idSize);
            pos += idSize;
            var name = ReadString(file, pos, nameSize);
            pos += nameSize;
            length += EntryHeaderSize + extra + idSize + nameSize;
            if (length > MaxTableSize || pos - (long)start > int.MaxValue)
            {
                error = "ERROR failed to read the snapshot table: Snapshot table is too big";
                return null;
            }
            list.Add(new SnapshotEntry(i, id, name, l1Offset, l1Size, extra));
        }
        tableSize = pos - (long)start;
        return list;
    }

    private static string ReadString(ImageStorage file, long offset, int size)
    {
        if (size == 0)
        {
            return "";
        }
        var buf = new byte[size];
        CheckIo.ReadZeroPadded(file, (ulong)offset, buf);
        return Encoding.UTF8.GetString(buf);
    }
}
