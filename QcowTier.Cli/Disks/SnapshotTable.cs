using System.Buffers.Binary;
using System.Text;

namespace QcowTier.Cli.Disks;

/// <summary>An internal snapshot as qemu-img info lists it.</summary>
internal sealed record SnapshotEntry(string Id, string Name, long VmStateSize, uint DateSec, uint DateNsec, ulong VmClockNsec, ulong? Icount);

/// <summary>Reads a qcow2 image's snapshot table straight from the file (the library only counts snapshots).</summary>
internal static class SnapshotTable
{
    public static IReadOnlyList<SnapshotEntry> Read(string path)
    {
        using var f = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        Span<byte> header = stackalloc byte[72];
        header.Clear();
        RandomAccess.Read(f, header, 0);
        var count = BinaryPrimitives.ReadUInt32BigEndian(header[60..]);
        var offset = (long)BinaryPrimitives.ReadUInt64BigEndian(header[64..]);
        var result = new List<SnapshotEntry>();
        Span<byte> fixedPart = stackalloc byte[40];
        for (var i = 0; i < count && i < 65536; i++)
        {
            RandomAccess.Read(f, fixedPart, offset);
            var idSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[12..]);
            var nameSize = BinaryPrimitives.ReadUInt16BigEndian(fixedPart[14..]);
            var dateSec = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[16..]);
            var dateNsec = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[20..]);
            var vmClock = BinaryPrimitives.ReadUInt64BigEndian(fixedPart[24..]);
            long vmState = BinaryPrimitives.ReadUInt32BigEndian(fixedPart[32..]);
            var extraSize = (int)BinaryPrimitives.ReadUInt32BigEndian(fixedPart[36..]);
            var extra = new byte[extraSize];
            RandomAccess.Read(f, extra, offset + 40);
            ulong? icount = null;
            if (extraSize >= 8)
            {
                vmState = (long)BinaryPrimitives.ReadUInt64BigEndian(extra);
            }
            if (extraSize >= 24)
            {
                var ic = BinaryPrimitives.ReadUInt64BigEndian(extra.AsSpan(16));
                icount = ic == ulong.MaxValue ? null : ic;
            }
            var strings = new byte[idSize + nameSize];
            RandomAccess.Read(f, strings, offset + 40 + extraSize);
            result.Add(new SnapshotEntry(
                Encoding.UTF8.GetString(strings, 0, idSize),
                Encoding.UTF8.GetString(strings, idSize, nameSize),
                vmState, dateSec, dateNsec, vmClock, icount));
            offset += (40 + extraSize + idSize + nameSize + 7) & ~7L;
        }
        return result;
    }
}
