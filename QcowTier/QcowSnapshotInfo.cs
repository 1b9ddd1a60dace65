using QcowTier.Format;

namespace QcowTier;

/// <summary>One internal snapshot, as qemu-img snapshot -l lists it.</summary>
public sealed class QcowSnapshotInfo
{
    internal QcowSnapshotInfo(SnapshotHeader sn)
    {
        Id = sn.Id;
        Name = sn.Name;
        VmStateSize = sn.VmStateSize;
        Date = DateTimeOffset.FromUnixTimeSeconds(sn.DateSec).AddTicks(sn.DateNsec / 100);
        VmClock = TimeSpan.FromTicks((long)(sn.VmClockNsec / 100));
        VmClockNanoseconds = sn.VmClockNsec;
        DiskSize = sn.DiskSize;
        Icount = sn.Icount;
        DateSeconds = sn.DateSec;
        DateNanoseconds = sn.DateNsec;
    }

    /// <summary>The unique id string QEMU assigned (one more than the largest numeric id when created).</summary>
    public string Id { get; }

    /// <summary>The snapshot's name (tag).</summary>
    public string Name { get; }

    /// <summary>Bytes of saved VM state (0 for disk-only snapshots).</summary>
    public long VmStateSize { get; }

    /// <summary>When the snapshot was taken (UTC).</summary>
    public DateTimeOffset Date { get; }

    /// <summary>The date field in seconds since the Unix epoch, as stored.</summary>
    public uint DateSeconds { get; }

    /// <summary>The sub-second part of the date in nanoseconds, as stored.</summary>
    public uint DateNanoseconds { get; }

    /// <summary>The guest's VM clock when the snapshot was taken.</summary>
    public TimeSpan VmClock { get; }

    /// <summary>The VM clock in nanoseconds, as stored.</summary>
    public ulong VmClockNanoseconds { get; }

    /// <summary>The virtual disk size when the snapshot was taken.</summary>
    public long DiskSize { get; }

    /// <summary>Record/replay instruction count, or null when the snapshot has none.</summary>
    public long? Icount { get; }
}

/// <summary>No snapshot has the id or name asked for.</summary>
public sealed class QcowSnapshotNotFoundException : QcowException
{
    /// <summary>Creates the exception.</summary>
    public QcowSnapshotNotFoundException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What went wrong.</param>
    public QcowSnapshotNotFoundException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and an inner exception.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="inner">The cause.</param>
    public QcowSnapshotNotFoundException(string message, Exception inner) : base(message, inner) { }

    /// <summary>Creates the exception naming the image and the snapshot.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="fileName">The image file, when it has a name.</param>
    /// <param name="snapshot">The id or name that matched nothing.</param>
    public QcowSnapshotNotFoundException(string message, string? fileName, string? snapshot) : base(message)
    {
        FileName = fileName;
        Snapshot = snapshot;
    }

    /// <summary>The image file, when known.</summary>
    public string? FileName { get; }

    /// <summary>The id or name asked for.</summary>
    public string? Snapshot { get; }
}
