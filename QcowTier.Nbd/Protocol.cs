namespace QcowTier.Nbd;

/// <summary>Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md), fixed newstyle only.</summary>
internal static class Protocol
{
    public const ulong NbdMagic = 0x4e42444d41474943;         // "NBDMAGIC"
    public const ulong OptionMagic = 0x49484156454F5054;      // "IHAVEOPT"
    public const ulong OptionReplyMagic = 0x3e889045565a9;
    public const uint RequestMagic = 0x25609513;
    public const uint SimpleReplyMagic = 0x67446698;
    public const uint StructuredReplyMagic = 0x668e33ef;

    // Handshake flags (server) and client flags.
    public const ushort FlagFixedNewstyle = 1 << 0;
    public const ushort FlagNoZeroes = 1 << 1;
    public const uint ClientFixedNewstyle = 1 << 0;
    public const uint ClientNoZeroes = 1 << 1;

    // Transmission flags.
    public const ushort TxHasFlags = 1 << 0;
    public const ushort TxReadOnly = 1 << 1;
    public const ushort TxSendFlush = 1 << 2;
    public const ushort TxSendFua = 1 << 3;
    public const ushort TxSendTrim = 1 << 5;
    public const ushort TxSendWriteZeroes = 1 << 6;
    public const ushort TxSendDf = 1 << 7;
    public const ushort TxCanMultiConn = 1 << 8;
    public const ushort TxSendCache = 1 << 10;
    public const ushort TxSendFastZero = 1 << 11;

    // Options.
    public const uint OptExportName = 1;
    public const uint OptAbort = 2;
    public const uint OptList = 3;
    public const uint OptStartTls = 5;
    public const uint OptInfo = 6;
    public const uint OptGo = 7;
    public const uint OptStructuredReply = 8;
    public const uint OptListMetaContext = 9;
    public const uint OptSetMetaContext = 10;

    // Option replies.
    public const uint RepAck = 1;
    public const uint RepServer = 2;
    public const uint RepInfo = 3;
    public const uint RepMetaContext = 4;
    public const uint RepErrUnsup = 0x80000001;
    public const uint RepErrPolicy = 0x80000002;
    public const uint RepErrInvalid = 0x80000003;
    public const uint RepErrUnknown = 0x80000006;
    public const uint RepErrShutdown = 0x80000007;
    public const uint RepErrTooBig = 0x80000009;

    // NBD_REP_INFO types.
    public const ushort InfoExport = 0;
    public const ushort InfoName = 1;
    public const ushort InfoDescription = 2;
    public const ushort InfoBlockSize = 3;

    // Commands and command flags.
    public const ushort CmdRead = 0;
    public const ushort CmdWrite = 1;
    public const ushort CmdDisc = 2;
    public const ushort CmdFlush = 3;
    public const ushort CmdTrim = 4;
    public const ushort CmdCache = 5;
    public const ushort CmdWriteZeroes = 6;
    public const ushort CmdBlockStatus = 7;

    public const ushort CmdFlagFua = 1 << 0;
    public const ushort CmdFlagNoHole = 1 << 1;
    public const ushort CmdFlagDf = 1 << 2;
    public const ushort CmdFlagReqOne = 1 << 3;
    public const ushort CmdFlagFastZero = 1 << 4;

    // Structured reply chunks.
    public const ushort ReplyFlagDone = 1 << 0;
    public const ushort ReplyTypeNone = 0;
    public const ushort ReplyTypeOffsetData = 1;
    public const ushort ReplyTypeOffsetHole = 2;
    public const ushort ReplyTypeBlockStatus = 5;
    public const ushort ReplyTypeError = 0x8001;

    // base:allocation.
    public const uint StateHole = 1 << 0;
    public const uint StateZero = 1 << 1;
    public const string BaseAllocation = "base:allocation";
    public const uint BaseAllocationId = 1;

    // Errors.
    public const uint EPerm = 1;
    public const uint EIo = 5;
    public const uint ENoMem = 12;
    public const uint EInval = 22;
    public const uint ENoSpc = 28;
    public const uint EOverflow = 75;
    public const uint ENotSup = 95;
    public const uint EShutdown = 108;

    public const int RequestHeaderLength = 28;
    public const int SimpleReplyLength = 16;
    public const int StructuredHeaderLength = 20;

    /// <summary>The longest string the protocol allows (export names, queries, messages).</summary>
    public const int MaxStringLength = 4096;
}
